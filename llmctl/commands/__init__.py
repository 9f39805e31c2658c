"""One module per command: parse options, call one library function, render (render.py only)."""
