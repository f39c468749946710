"""Gemma 3's image input: the SigLIP encoder, the projector into the decoder's embedding space,
the prompt layout of image blocks and image preprocessing."""
