from shop.cart import Cart


def test_cart_total():
    cart = Cart()
    cart.add("apple", 2)
    cart.add("bread")
    assert cart.total() == 3.25
