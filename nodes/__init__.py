"""Built-in node types, one module per family, registered by type name on import."""
