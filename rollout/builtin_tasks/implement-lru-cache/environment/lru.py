class LRUCache:
    """A mapping of at most `capacity` entries; putting a new key into a full cache evicts the least
    recently used key (both get and put count as a use)."""

    def __init__(self, capacity):
        self.capacity = capacity

    def get(self, key, default=None):
        raise NotImplementedError

    def put(self, key, value):
        raise NotImplementedError

    def __len__(self):
        raise NotImplementedError
