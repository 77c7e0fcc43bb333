"""`compose tune`: fit a recipe's numbers (weights, densities, t, slice bounds) to a little text, scoring each trial
by streaming the merged model one layer at a time, with no model written until the best recipe is known.

ranges: the `{tune: [lo, hi]}` marks in a recipe, and the concrete recipe text of a trial. domains: where each
parameter may go. texts: the text files, read and checked. tensor_cache: parents' tensors kept between trials.
streamed: bits per byte of a plan's model, layer by layer. search: the optimisers. report: README, JSON and PNG.
run: the loop that ties them together.
"""
