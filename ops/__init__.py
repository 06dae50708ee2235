"""The arborl CLI and configuration."""
