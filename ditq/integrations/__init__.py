"""Bridges to other libraries. `ditq.integrations.diffusers` registers adapters for diffusers transformers
without importing diffusers itself (that happens on first use), so importing it costs nothing."""
