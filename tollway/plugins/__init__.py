"""Plugins: phase hooks that run on every request of the routes, services or consumers they apply to."""
