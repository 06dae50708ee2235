from calendar_utils import days_in_year, is_leap


def test_centuries():
    assert not is_leap(1900)
    assert is_leap(2000)


def test_ordinary_years():
    assert is_leap(2024) and not is_leap(2023)
    assert days_in_year(2023) == 365
