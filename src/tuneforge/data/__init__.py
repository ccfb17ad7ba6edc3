"""Raw data to validated chat examples: sources, cleaning, mapping, checks, tokens, split, report.

collect.py   one source through every stage; prepare.py: the `prepare` verb over train and valid, written at once
prepared.py  a prepared folder read back (train, eval, rag and merge read it)
chat.py      the chat template as training sequences with loss masks; plan.py: the training plan from the data
"""
