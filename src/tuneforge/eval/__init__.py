"""`tuneforge eval`: every system of the experiment on one eval set, side by side in one report.

harness.py    the verb: which systems, which tasks (labels, free answers), cached answers, then the report
cache.py      answers keyed by what produced them, so a rerun asks only the systems that changed
scores.py     similarity, quality and label metrics; judge.py: an LLM judge's pairwise verdicts
baselines.py  tf-idf and majority-class floors for labelled data
report.py     report.md / report.html with charts
"""
