"""Text in and out: conversations rendered through the chat template under a time limit
(`render.py`, `timelimit.py`), images in prompts (`images.py`, `processor.py`), committed text split
into thought, answer and tool calls (`channels.py`), and drafts shown token by token (`labels.py`)."""
