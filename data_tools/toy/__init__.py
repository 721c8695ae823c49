"""The miniature: a family of list tasks described in words, and its data files."""
