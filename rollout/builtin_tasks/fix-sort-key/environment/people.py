def sort_people(people):
    """People (dicts with "name" and "age") ordered by age, youngest first; equal ages by name."""
    return sorted(people, key=lambda person: person["name"])
