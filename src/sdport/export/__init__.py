"""Exporters that need a model's real modules (torch), imported only when used."""
