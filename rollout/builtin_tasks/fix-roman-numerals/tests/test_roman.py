from roman import to_roman


def test_subtractive():
    assert to_roman(4) == "IV"
    assert to_roman(9) == "IX"
    assert to_roman(1994) == "MCMXCIV"
    assert to_roman(3999) == "MMMCMXCIX"


def test_additive():
    assert to_roman(3) == "III"
    assert to_roman(2023) == "MMXXIII"
