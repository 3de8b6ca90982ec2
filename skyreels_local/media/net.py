"""Which addresses outbound requests may reach, and the HTTP client that enforces it.

Image downloads and webhook deliveries go to user-supplied URLs. By default a URL that resolves to
a non-public address (loopback, private, link-local incl. cloud metadata, multicast) is refused,
unless its host or network is allow-listed (SKYREELS_URL_ALLOW_LIST). The check runs on the address
actually connected to, on every redirect hop, so a DNS name that resolves to 127.0.0.1 or a redirect
to 169.254.169.254 is refused too.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import httpcore
import httpx

from ..errors import InvalidInputError, MediaError, shorten

MAX_REDIRECTS = 5


class BlockedAddressError(MediaError):
    """A URL would reach an address that is not public and not allow-listed."""


def describe_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not public (None when it is)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (this includes cloud metadata services)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private-network address"
    if not ip.is_global:
        return "a non-public address"
    return None


def is_legacy_ipv4(host: str) -> bool:
    """Whether `host` is an IPv4 address in one of the legacy forms resolvers still accept
    (0x7f.1, 2130706433, 127.1, 0177.0.0.1): nobody writes those but to slip past filters, so
    they are refused at submit. The address policy still checks the canonical form."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


class AddressPolicy:
    """Which addresses outbound requests (image downloads, webhooks) may connect to."""

    def __init__(self, allow: list[str] | None = None) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow or []:
            entry = entry.strip()
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower().rstrip("."))

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to for `host`, or BlockedAddressError naming the reason."""
        return self.addresses(host, port)[0]

    def addresses(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, in the resolver's order, once all are found allowed
        (one refused address refuses the host: DNS answers can be mixed on purpose)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise MediaError(f"cannot resolve host {host!r}: {exc.strerror or exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if host.lower().rstrip(".") in self.allowed_hosts:
            return addresses
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            reason = describe_address(ip)
            if reason is not None and not any(ip in net for net in self.allowed_networks):
                raise BlockedAddressError(
                    f"host {host!r} resolves to {address}, {reason}; refused "
                    "(allow it with SKYREELS_URL_ALLOW_LIST / --url-allow-list)"
                )
        return addresses


def check_webhook_url(policy: AddressPolicy, url: str, *, field: str) -> None:
    """Refuse at submit a webhook URL whose host the policy refuses (loopback, private, metadata),
    instead of failing every delivery for the whole retry window. A host that does not resolve
    now is let through: DNS can be briefly down, and each delivery checks again anyway."""
    parts = httpx.URL(url)  # already parsed once by parse_skyreels_input
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        policy.addresses(parts.raw_host.decode("ascii"), port)  # IDNA-encoded, as sent to DNS
    except BlockedAddressError as exc:
        raise InvalidInputError(field, shorten(url), f"is refused: {exc.message}") from None
    except MediaError:
        return
    except ValueError as exc:  # a name the resolver cannot even encode (UnicodeError)
        raise InvalidInputError(field, shorten(url), f"has a host that cannot be resolved ({exc})") from None


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        # Each allowed address in turn, as a plain connect would (e.g. `localhost` -> ::1, then
        # 127.0.0.1). TLS still verifies `host` (httpcore passes the URL's host as server_hostname).
        addresses = self._policy.addresses(host, port)
        for address in addresses[:-1]:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return self._inner.connect_tcp(addresses[-1], port, timeout, local_address, socket_options)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise BlockedAddressError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend(policy)
        )


def guarded_client(policy: AddressPolicy, *, timeout: float, follow_redirects: bool = True) -> httpx.Client:
    """An httpx client for user-supplied URLs: policy-checked connections, no proxies from the
    environment (they would bypass the check), bounded redirects (or none)."""
    return httpx.Client(
        transport=_GuardedTransport(policy),
        trust_env=False,
        follow_redirects=follow_redirects,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": "skyreels-local"},
    )
