"""Text -> tokens -> blocks -> masked batches: loading any source and splitting it (`text.py`), the built-in
corpora (`corpora.py`), tokenizing and grouping into blocks (`blocks.py`), the block cache and `mlmtune prepare`
(`prepare.py`), the same on the fly (`stream.py`), and the masking schemes (`masking.py`)."""
