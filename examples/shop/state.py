"""The shop's data and rules, without HTTP: users, products, tokens, carts, orders.

Every rule that makes the shop misbehave on purpose lives here, so that it is the same
whichever client asks: the inventory answers 503 ``INVENTORY_FAILURES`` times per (token,
product), recommendations are throttled once per token, and an order reads "pending"
``PENDING_READS`` times before it reads "shipped".
"""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

VERSION = "1.4.2"
INVENTORY_FAILURES = 2
"""503 answers per (token, product) before /inventory succeeds."""
PENDING_READS = 2
"""Reads of an order that still see "pending"; the next read, and all after, see "shipped"."""

USERS: dict[str, dict[str, Any]] = {
    "alice": {"user_id": 1, "name": "Alice Liddell", "role": "admin"},
    "bob": {"user_id": 2, "name": "Bob Builder", "role": "customer"},
}
"""Fixed users with a profile. Any user's password is ``secret-<username>``."""
_GENERATED_USER = re.compile(r"^user(\d{3})$")
"""user001..user999 (ids 1001..1999) also accept ``pw-<username>``, as in users.csv."""
_USERNAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

PRODUCTS: list[dict[str, Any]] = [
    {"id": 1, "name": "Baton T-shirt", "price": 19.99, "stock": 120, "category": "apparel"},
    {"id": 2, "name": "HTTP Pocket Guide", "price": 42.5, "stock": 15, "category": "books"},
    {"id": 3, "name": "Event Sourcing Notes", "price": 35.0, "stock": 8, "category": "books"},
    {"id": 4, "name": "Mechanical Keyboard", "price": 129.0, "stock": 30, "category": "hardware"},
    {"id": 5, "name": "USB-C Cable", "price": 9.99, "stock": 500, "category": "hardware"},
    {"id": 6, "name": "Sticker Pack", "price": 4.0, "stock": 1000, "category": "apparel"},
    {"id": 7, "name": "Designing Data APIs", "price": 38.0, "stock": 0, "category": "books"},
]
_PRODUCTS_BY_ID = {product["id"]: product for product in PRODUCTS}


class ApiError(Exception):
    """An answer other than success: the server turns it into ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Session:
    username: str
    user_id: int
    expires_at: float = float("inf")


def product_or_404(raw: Any) -> dict[str, Any]:
    # templates keep a number a number, but a hand-written URL or body may send "3"
    with contextlib.suppress(TypeError, ValueError):
        product = _PRODUCTS_BY_ID.get(int(raw))
        if product is not None:
            return product
    raise ApiError(404, f"product {raw} not found")


def _quantity(data: dict[str, Any], product: dict[str, Any]) -> int:
    quantity = data.get("quantity", 1)
    if isinstance(quantity, str) and quantity.isdigit():
        quantity = int(quantity)
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
        raise ApiError(422, "quantity must be a positive integer")
    if quantity > product["stock"]:
        raise ApiError(409, f"only {product['stock']} of product {product['id']} in stock")
    return quantity


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in ("user_id", "reads")}


@dataclass
class ShopState:
    token_ttl: float
    access: dict[str, Session] = field(default_factory=dict)
    refresh: dict[str, Session] = field(default_factory=dict)
    cookies: dict[str, Session] = field(default_factory=dict)
    other_user_ids: dict[str, int] = field(default_factory=dict)
    carts: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: dict[int, dict[str, Any]] = field(default_factory=dict)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    inventory_calls: dict[tuple[str, int], int] = field(default_factory=dict)
    throttled: set[str] = field(default_factory=set)
    order_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))
    feedback_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # -- authentication

    def login(self, username: str, password: str, ttl: float | None) -> dict[str, Any]:
        generated = _GENERATED_USER.match(username)
        if generated and password in (f"pw-{username}", f"secret-{username}"):
            user_id = 1000 + int(generated.group(1))
        elif password == f"secret-{username}" and _USERNAME.match(username):
            default = USERS.get(username, {}).get("user_id")
            user_id = default or self.other_user_ids.setdefault(
                username, 5000 + len(self.other_user_ids)
            )
        else:
            raise ApiError(401, "invalid username or password")
        # a shorter lifetime on request lets a flow watch its token expire
        lifetime = min(ttl, self.token_ttl) if ttl is not None and ttl > 0 else self.token_ttl
        return self._issue(Session(username, user_id), lifetime)

    def refreshed(self, refresh_token: str) -> dict[str, Any]:
        session = self.refresh.get(refresh_token)
        if session is None:
            raise ApiError(401, "invalid refresh token")
        return self._issue(session, self.token_ttl)

    def _issue(self, user: Session, ttl: float) -> dict[str, Any]:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.access[access] = Session(user.username, user.user_id, time.monotonic() + ttl)
        self.refresh[refresh] = Session(user.username, user.user_id)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": int(ttl) if ttl == int(ttl) else ttl,
            "user_id": user.user_id,
        }

    def new_cookie(self, user_id: int, username: str) -> str:
        cookie = secrets.token_urlsafe(16)
        self.cookies[cookie] = Session(username, user_id)
        return cookie

    def bearer(self, authorization: str) -> tuple[Session, str]:
        """The session and token of an ``Authorization`` header; ApiError 401 otherwise."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token", challenge)
        session = self.access.get(token)
        if session is None:
            raise ApiError(401, "invalid token", challenge)
        if time.monotonic() >= session.expires_at:
            raise ApiError(401, "token expired", challenge)
        return session, token

    @staticmethod
    def profile(user: Session) -> dict[str, Any]:
        known = USERS.get(user.username, {"name": user.username.title(), "role": "customer"})
        return {
            "user_id": user.user_id,
            "username": user.username,
            "name": known["name"],
            "email": f"{user.username}@shop.example",
            "roles": [known["role"]],
        }

    # -- carts and orders

    def new_cart(self, user: Session, data: dict[str, Any]) -> dict[str, Any]:
        cart_id = f"cart-{secrets.token_hex(6)}"
        cart = {"cart_id": cart_id, "user_id": user.user_id, "items": [], "checked_out": False}
        self._add(cart, data)  # raises before a cart with a bad item is stored
        self.carts[cart_id] = cart
        return _public(cart)

    def cart(self, user: Session, cart_id: Any) -> dict[str, Any]:
        cart = self.carts.get(str(cart_id))
        if cart is None or cart["user_id"] != user.user_id:
            raise ApiError(404, f"cart {cart_id} not found")
        return cart

    def add_item(self, user: Session, cart_id: str, data: dict[str, Any]) -> dict[str, Any]:
        cart = self.cart(user, cart_id)
        if cart["checked_out"]:
            raise ApiError(409, f"cart {cart_id} is already checked out")
        self._add(cart, data)
        return _public(cart)

    @staticmethod
    def _add(cart: dict[str, Any], data: dict[str, Any]) -> None:
        item = product_or_404(data.get("product_id"))
        quantity = _quantity(data, item)
        line = {"product_id": item["id"], "name": item["name"], "price": item["price"]}
        cart["items"].append({**line, "quantity": quantity})
        cart["total"] = round(sum(i["price"] * i["quantity"] for i in cart["items"]), 2)

    def checkout(self, user: Session, cart_id: Any) -> dict[str, Any]:
        cart = self.cart(user, cart_id)
        if cart["checked_out"]:
            raise ApiError(409, f"cart {cart_id} is already checked out")
        cart["checked_out"] = True
        order = {
            "order_id": next(self.order_ids),
            "user_id": user.user_id,
            "cart_id": cart["cart_id"],
            "status": "pending",
            "items": cart["items"],
            "total": cart["total"],
            "reads": 0,
        }
        self.orders[order["order_id"]] = order
        return _public(order)

    def read_order(self, user: Session, order_id: str) -> dict[str, Any]:
        order = self.orders.get(int(order_id)) if order_id.isdigit() else None
        if order is None or order["user_id"] != user.user_id:
            raise ApiError(404, f"order {order_id} not found")
        order["reads"] += 1
        if order["reads"] > PENDING_READS and order["status"] == "pending":
            order.update(status="shipped", tracking_number=f"TRK-{order['order_id']:08d}")
        return _public(order)

    def user_orders(self, user: Session) -> list[dict[str, Any]]:
        return [_public(o) for o in self.orders.values() if o["user_id"] == user.user_id]

    # -- the endpoints that fail on purpose

    def inventory(self, token: str, product_id: str) -> dict[str, Any]:
        item = product_or_404(product_id)
        key = (token, item["id"])
        self.inventory_calls[key] = self.inventory_calls.get(key, 0) + 1
        if self.inventory_calls[key] <= INVENTORY_FAILURES:
            raise ApiError(503, "inventory service unavailable, try again")
        return {"product_id": item["id"], "stock": item["stock"], "warehouse": "AMS-1"}

    def recommendations(self, token: str) -> dict[str, Any]:
        if token not in self.throttled:
            self.throttled.add(token)
            raise ApiError(429, "too many requests", {"Retry-After": "1"})
        picks = [p for p in PRODUCTS if p["stock"] > 0][:3]
        return {"products": picks, "count": len(picks)}

    # -- feedback

    def add_feedback(self, user: Session, rating: str, comment: str) -> dict[str, Any]:
        if not rating.isdigit() or not 1 <= int(rating) <= 5:
            raise ApiError(422, "rating must be an integer from 1 to 5")
        entry = {
            "id": next(self.feedback_ids),
            "user_id": user.user_id,
            "rating": int(rating),
            "comment": comment,
        }
        self.feedback.append(entry)
        return _public(entry)

    def user_feedback(self, user: Session) -> list[dict[str, Any]]:
        return [_public(entry) for entry in self.feedback if entry["user_id"] == user.user_id]
