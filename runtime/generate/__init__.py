"""Generation: Model, the token loop, sampling, stop strings, tokenizer, decode benchmark."""
