"""The admin REST API (docs/admin-api.md): entities of the config store over JSON/HTTP, with ETags,
a bulk endpoint sharing `tollway config diff/apply`'s engine, OpenAPI 3.1, tokens and an audit log.

- `http`: the listener's small HTTP/1.1 server; `server`: the listener as the supervisor runs it;
- `app`: routing and access control; `entities`, `children`, `bulk`: the handlers;
- `common`, `errors`: what handlers share; `openapi`: the document and its page; `tokens`, `cli`.

Layering: above store (it writes through `ConfigStore`), below runtime, which starts the listener.
"""
