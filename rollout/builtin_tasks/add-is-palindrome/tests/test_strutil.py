import strutil


def test_is_palindrome():
    assert strutil.is_palindrome("racecar")
    assert strutil.is_palindrome("A man, a plan, a canal: Panama")
    assert strutil.is_palindrome("")
    assert not strutil.is_palindrome("arborl")


def test_reverse():
    assert strutil.reverse("abc") == "cba"
