import re


def slugify(title):
    """A URL slug: lower case, words joined by single dashes, everything but letters and digits dropped.
    slugify("Hello, World!") == "hello-world" """
    return "-".join(re.findall(r"[a-z0-9]+", title.lower()))
