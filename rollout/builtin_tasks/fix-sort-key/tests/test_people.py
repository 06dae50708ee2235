from people import sort_people

PEOPLE = [{"name": "Cy", "age": 40}, {"name": "Bo", "age": 25}, {"name": "Al", "age": 40},
          {"name": "Di", "age": 19}]


def test_by_age_then_name():
    assert [p["name"] for p in sort_people(PEOPLE)] == ["Di", "Bo", "Al", "Cy"]


def test_returns_all_people():
    assert len(sort_people(PEOPLE)) == 4
