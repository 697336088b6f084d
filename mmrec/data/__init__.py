"""Text in, tokens out: corpus sources, cleaning and the stable split (corpus), SentencePiece and the token
files (tokenizer), and training windows over them (windows). Uses only the base modules of mmrec/."""
