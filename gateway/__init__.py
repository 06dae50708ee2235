"""The gateway: API dialects, sessions, rendering, engines, recording, metrics."""
