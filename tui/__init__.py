"""nanochat-mlx's terminal chat app (Textual). Entry point: :func:`tui.app.run_tui`."""
