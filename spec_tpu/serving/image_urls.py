"""Images named in chat requests (OpenAI `image_url` content parts) -> their encoded bytes.

data: URLs (base64) are read inline. Local files (file:// URLs or absolute paths) only under the
directories the server was started with (an allow-list; none by default), resolved after
symlinks, so a request cannot read anything else on the host. Remote (http, https) URLs are
refused unless the server opts into fetching them (`Fetch`: serve.fetch_image_urls), since
fetching lets any client make the server call any address it can reach; fetched, the host must
resolve to public addresses only (loopback, private, link-local and reserved ones refused unless
the server allows them: serve.fetch_private_hosts), at the first request and at every redirect,
every connection must land on one, and a body must be served as image/*, arrive within the time
limit and stay under the size limit."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

MAX_BYTES = 32 << 20  # one image's encoded size at most


@dataclasses.dataclass(frozen=True)
class Fetch:
  """Remote image URLs fetched, not refused: each download at most max_bytes, whole within
  timeout_s seconds; private_hosts: also from hosts at loopback, private, link-local or reserved
  addresses (the server's own network, a cloud's metadata service), refused by default."""
  timeout_s: float = 10.0
  max_bytes: int = MAX_BYTES
  private_hosts: bool = False

  def __post_init__(self):
    if not (self.timeout_s > 0 and self.max_bytes > 0):
      raise ValueError(f"fetching image URLs needs a timeout > 0 and a size limit > 0, got "
                       f"{self.timeout_s} s and {self.max_bytes} bytes")


def read(url, allowed_dirs: Sequence[str] = (), what: str = "image",
         fetch: Fetch | None = None) -> bytes:
  """The encoded image a URL names, or a ValueError saying why it is refused. fetch: how
  http(s) URLs are fetched (None: they are refused). Blocks while it downloads."""
  if not isinstance(url, str) or not url:
    raise ValueError(f"{what}: image_url.url must be a non-empty string")
  scheme = url.split(":", 1)[0].lower() if ":" in url else ""
  if scheme == "data":
    head, sep, data = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
      raise ValueError(f"{what}: a data: URL must be base64 (data:image/png;base64,...)")
    if len(data) > MAX_BYTES * 4 // 3 + 4:
      raise ValueError(f"{what} is larger than {MAX_BYTES >> 20} MiB")
    try:
      return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
      raise ValueError(f"{what}: the data: URL holds invalid base64") from None
  if scheme in ("http", "https") and fetch is not None:
    return _fetch(url, fetch, what)
  if scheme in ("http", "https", "ftp"):
    raise ValueError(f"{what}: remote image URLs are not fetched; send the image inline as a "
                     "data: URL (data:image/png;base64,...)")
  if scheme == "file":
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
  elif url.startswith("/"):
    path = url
  else:
    raise ValueError(f"{what}: unsupported image URL (use a data: URL)")
  return _read_allowed(path, allowed_dirs, what)


def _read_allowed(path: str, allowed_dirs: Sequence[str], what: str) -> bytes:
  if not allowed_dirs:
    raise ValueError(f"{what}: local image paths are refused (the server reads files only "
                     "under directories given to it as image_dirs)")
  real = os.path.realpath(path)
  roots = [os.path.realpath(d) for d in allowed_dirs]
  if not any(os.path.commonpath([real, root]) == root for root in roots):
    raise ValueError(f"{what}: {path!r} is outside the directories images may be read from")
  try:
    if os.path.getsize(real) > MAX_BYTES:
      raise ValueError(f"{what} is larger than {MAX_BYTES >> 20} MiB")
    with open(real, "rb") as fh:
      return fh.read()
  except OSError as e:
    raise ValueError(f"{what}: cannot read {path!r}: {e.strerror}") from None


def _not_public(host, ip: str, verb: str) -> str | None:
  """None when ip (as a socket gives it, maybe with a %scope) is a public address, else why."""
  address = ipaddress.ip_address(ip.split("%", 1)[0])
  if address.is_global and not address.is_multicast:
    return None
  return (f"{host!r} {verb} {address}, not a public address (a server fetches from private "
          "hosts only with serve.fetch_private_hosts)")


def _public_host(url: str) -> str | None:
  """None when every address the URL's host resolves to is public, else why not."""
  parts = urllib.parse.urlparse(url)
  try:
    infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
  except (socket.gaierror, UnicodeError, ValueError) as e:
    return f"cannot resolve {parts.hostname!r}: {e}"
  return next((why for info in infos if (why := _not_public(parts.hostname, info[4][0],
                                                            "is at"))), None)


def _public_connection(address, *args, **kwargs):
  """socket.create_connection, refusing a peer that is not at a public address: the check
  above resolves the name once and the connection again, and a DNS server may answer the
  second lookup with an inward address."""
  sock = socket.create_connection(address, *args, **kwargs)
  if why := _not_public(address[0], sock.getpeername()[0], "connected to"):
    sock.close()
    raise OSError(why)
  return sock


class _PublicHTTPConnection(http.client.HTTPConnection):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._create_connection = _public_connection


class _PublicHTTPSConnection(http.client.HTTPSConnection):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._create_connection = _public_connection


class _PublicHTTPHandler(urllib.request.HTTPHandler):
  def http_open(self, req):
    return self.do_open(_PublicHTTPConnection, req)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
  def https_open(self, req):
    return self.do_open(_PublicHTTPSConnection, req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
  """Follows redirects to http(s) only (urllib would also follow one to ftp), and, unless private
  hosts are allowed, only to public ones (a public host must not bounce the fetch inward)."""

  def __init__(self, private_hosts: bool):
    self.private_hosts = private_hosts

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
      raise urllib.error.HTTPError(newurl, code, "redirected to a non-http(s) URL", headers, fp)
    if not self.private_hosts and (why := _public_host(newurl)):
      raise urllib.error.HTTPError(newurl, code, f"redirected to {why}", headers, fp)
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, fetch: Fetch, what: str) -> bytes:
  shown = url if len(url) <= 100 else url[:97] + "..."
  failed = f"{what}: fetching {shown} failed"
  deadline = time.monotonic() + fetch.timeout_s
  if not fetch.private_hosts and (why := _public_host(url)):
    raise ValueError(f"{failed}: {why}")
  request = urllib.request.Request(url, headers={"Accept": "image/*",
                                                 "User-Agent": "spec_tpu-image-fetch"})
  handlers = [_Redirects(fetch.private_hosts)]
  if not fetch.private_hosts:  # every connection, redirects' too, checked where it lands
    handlers += [_PublicHTTPHandler(), _PublicHTTPSHandler()]
  opener = urllib.request.build_opener(*handlers)
  try:
    response = opener.open(request, timeout=fetch.timeout_s)
  except urllib.error.HTTPError as e:
    raise ValueError(f"{failed}: HTTP {e.code} {e.reason}") from None
  except urllib.error.URLError as e:
    raise ValueError(f"{failed}: {e.reason}") from None
  except (http.client.HTTPException, OSError, ValueError) as e:  # timeouts, bad hosts, ports
    raise ValueError(f"{failed}: {e or type(e).__name__}") from None
  with response:
    kind = response.headers.get_content_type()  # text/plain when the header is missing
    if not kind.startswith("image/"):
      raise ValueError(f"{what}: {shown} is served as {kind!r}, not as an image (image/*)")
    too_large = ValueError(f"{what}: {shown} is larger than the {fetch.max_bytes} bytes an "
                           "image may be")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > fetch.max_bytes:
      raise too_large
    chunks, size = [], 0
    try:
      while chunk := response.read(min(1 << 16, fetch.max_bytes + 1 - size)):
        size += len(chunk)
        if size > fetch.max_bytes:
          raise too_large
        if time.monotonic() > deadline:  # the socket timeout bounds each read, not the sum
          raise ValueError(f"{failed}: not downloaded within {fetch.timeout_s} s")
        chunks.append(chunk)
    except (http.client.HTTPException, OSError) as e:
      raise ValueError(f"{failed}: {e or type(e).__name__}") from None
  return b"".join(chunks)
