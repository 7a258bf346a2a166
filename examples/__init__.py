"""Examples that ship with Tollway: the user service behind `tollway demo`, configs, a custom plugin."""
