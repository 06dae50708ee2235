import pytest
from bank import Account, InsufficientFunds


def test_withdraw():
    account = Account(100)
    account.withdraw(30)
    assert account.balance == 70


def test_withdraw_too_much():
    account = Account(10)
    with pytest.raises(InsufficientFunds):
        account.withdraw(11)
    assert account.balance == 10
    with pytest.raises(ValueError):
        account.withdraw(0)


def test_deposit():
    account = Account()
    account.deposit(5)
    assert account.balance == 5
