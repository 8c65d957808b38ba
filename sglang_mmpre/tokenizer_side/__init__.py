"""Tokenizer side: materialize and hash off the event loop, pack tensors into a segment,
count consumers per send. ``manager.TokenizerSide`` is what the patched
TokenizerManager calls."""
