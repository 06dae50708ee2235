def greet(name):
    """A friendly greeting: greet("Ada") == "Hello, Ada!"."""
    return f"Hello, {name}!"
