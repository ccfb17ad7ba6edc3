"""The feedback loop: what demo users say about answers (store), what it adds up to (summary), and the training
files it becomes (export)."""
