"""Model card templates (Jinja, rendered by `proclip card`), shipped as package data of `proclip_train`."""
