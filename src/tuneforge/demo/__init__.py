"""The Gradio page of `tuneforge demo`: chat with any system of a run, or compare up to four side by side.

access.py    who may reach the page and what it may serve (safe defaults, checked before launch)
answers.py   streams answers from systems, one at a time or several at once, without Gradio
app.py       the page itself and `launch`
"""
