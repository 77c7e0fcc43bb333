"""Merge forensics (`compose trace`): tell whether a model was built from others, from which, and how.

It reads, it does not write: models are opened through composer.sources, fingerprinted in one streaming
pass (a digest and a random projection of every tensor), matched layer by layer, and each SUSPECT tensor
is fitted in reverse against the methods' formulas. The result is a report and a recipe composer runs.

The package imports nothing itself, so that composer.trace.prescan can start reading before torch is imported;
the entry point is composer.trace.run.trace_models.
"""
