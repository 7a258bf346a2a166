"""The plugins that ship with Tollway, one module each (the config name maps to its class in
tollway.plugins.registry.BUILTIN), plus what several of them share: auth.py (the authentication
plugins' base), limiting.py (rate-limiting and concurrency-limit), transform.py (the transformers),
jwks.py, passwords.py and netutil.py. They use only the plugin API (tollway.plugins), as a user's
plugin does; the framework itself (base, registry, build, consumers) lives one level up."""
