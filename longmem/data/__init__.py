"""Data: the corpora longmem is trained and evaluated on, and the document streams training reads."""
