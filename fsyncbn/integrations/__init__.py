"""Optional integrations with other libraries, each imported only when asked.

- :mod:`fsyncbn.integrations.timm`: timm's norm + activation layers (registered by itself
  when timm is imported; :func:`fsyncbn.convert_model` loads it whenever timm is loaded).
- :mod:`fsyncbn.integrations.lightning`: a Lightning ``LayerSync`` plugin.

The core package needs only torch; importing an integration needs its library.
"""
