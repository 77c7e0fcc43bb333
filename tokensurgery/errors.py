class TokenSurgeryError(ValueError):
    """A problem with the input the caller can fix; one paragraph naming the model, tokenizer or tensor at fault."""
