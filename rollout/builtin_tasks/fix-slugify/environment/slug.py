def slugify(title):
    """A URL slug: lower case, words joined by single dashes, everything but letters and digits dropped.
    slugify("Hello, World!") == "hello-world" """
    return title.lower().replace(" ", "-")
