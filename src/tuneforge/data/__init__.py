"""Raw data to validated chat examples: sources, cleaning, mapping, checks, tokens, split, report."""
