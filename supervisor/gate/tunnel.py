"""Relaying a WebSocket (`Upgrade: websocket`) through the gate as a byte tunnel.

Policy:
- The HTTP/1.1 handshake goes through h11 like any request: the client's head is read by
  the gate's h11 connection, written afresh for the upstream (its end-to-end headers,
  `Sec-WebSocket-*` included, with `Connection: Upgrade` and `Upgrade` set again, as they
  are hop-by-hop) on a fresh upstream connection, never a pooled one.
- Upstream answers 101: the 101 goes to the client through h11, which then hands over
  the bytes that followed the heads on either side; from then on bytes are relayed both
  ways as they come, unparsed (the WebSocket frames are the two ends' business), until
  either side closes, or nothing moved either way for `idle_s`. Both connections are
  then closed. Buffers stay bounded: each side's reading pauses at `Limits.buffer_bytes`
  and a write waits for the other side to drain, at most `Limits.send_timeout_s`.
- Upstream answers anything else (404, 400, 403...): that answer is relayed like any other
  and the connection is closed after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import h11

from supervisor.gate.http11 import (
    REQUEST_DROP,
    RESPONSE_DROP,
    Fields,
    Headers,
    Stream,
    connection_tokens,
    fields_of,
    header_value,
)
from supervisor.gate.relay import (
    ClientGone,
    Exchange,
    Origin,
    Pool,
    UpstreamError,
    _client_response,
    _relay_answer_body,
    _upstream_event,
)

# A WebSocket with no byte either way for this long is closed. ComfyUI's web UI sends
# nothing while it waits, and ComfyUI sends only on queue changes: an hour keeps an open
# browser tab connected through a quiet spell, and reclaims sockets left behind.
WS_IDLE_S = 3600.0


def is_upgrade(req: h11.Request, fields: Fields) -> bool:
    """A WebSocket handshake: `GET` with `Connection: upgrade` and `Upgrade: websocket`."""
    if req.method != b"GET" or b"upgrade" not in connection_tokens(fields):
        return False
    upgrade = header_value(fields, b"upgrade")
    return upgrade is not None and b"websocket" in upgrade.lower()


async def tunnel(
    *,
    pool: Pool,
    origin: Origin,
    ex: Exchange,
    idle_s: float = WS_IDLE_S,
    on_open: Callable[[], None] | None = None,
) -> None:
    """Send the handshake upstream, relay the answer; after a 101 relay bytes both ways
    until either side closes. UpstreamError (is_answered False: answer 502) when the
    upstream cannot be reached or breaks before its answer; ClientGone when the client
    goes away. `on_open` runs when the tunnel opens."""
    upgrade = header_value(ex.fields, b"upgrade") or b"websocket"
    tokens = connection_tokens(ex.fields)
    headers: Headers = [(b"Host", origin.host_header)]
    for low, name, value in ex.fields:
        if low not in REQUEST_DROP and low not in tokens:
            headers.append((name, value))
    headers += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
    request = h11.Request(
        method=b"GET", target=origin.base_path + ex.path, headers=headers, _parsed=True
    )
    conn = await pool.get(origin, is_fresh=True)
    try:
        up, stream = conn.http, conn.stream
        try:
            stream.write(up.send(request) + (up.send(h11.EndOfMessage()) or b""))
            await stream.drain()
        except OSError as exc:
            raise UpstreamError(f"{origin.url} broke the connection: {exc}") from exc
        url = origin.url
        while True:
            try:
                event = await _upstream_event(up, stream, ex, is_answered=False, url=url)
            except h11.ProtocolError as exc:
                raise UpstreamError(f"{url} sent a malformed answer: {exc}") from exc
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue  # 100, 103: nothing a WebSocket client waits for
            break
        if isinstance(event, h11.InformationalResponse):
            fields = fields_of(event.headers)
            kept = [(n, v) for low, n, v in fields if low not in RESPONSE_DROP]
            kept += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
            await ex.send(
                h11.InformationalResponse(status_code=101, headers=kept, reason=event.reason)
            )
            if on_open is not None:
                on_open()
            await _pipe(ex, stream, up.trailing_data[0], idle_s)
            return
        if not isinstance(event, h11.Response):
            raise UpstreamError(f"{url} closed the connection without an answer")
        await _relay_refusal(ex, up, stream, event, url)
    finally:
        conn.close()


async def _relay_refusal(
    ex: Exchange, up: h11.Connection, stream: Stream, resp: h11.Response, url: str
) -> None:
    """The upstream refused the upgrade: relay its answer as it is."""
    ex.queue(_client_response(resp, fields_of(resp.headers), b"GET"))
    await _relay_answer_body(ex, up, stream, url)


async def _pipe(ex: Exchange, upstream: Stream, from_upstream: bytes, idle_s: float) -> None:
    """Bytes both ways until either side closes or both are quiet for `idle_s`."""
    client = ex.stream
    from_client = bytes(ex.client.trailing_data[0])
    last = [time.monotonic()]
    send_s = ex.limits.send_timeout_s

    async def pump(src: Stream, dst: Stream, first: bytes) -> None:
        data = first
        while True:
            if data:
                last[0] = time.monotonic()
                dst.write(data)
                if dst.is_writing_paused:
                    async with asyncio.timeout(send_s):
                        await dst.drain()
            try:
                async with asyncio.timeout(idle_s):
                    data = await src.read()
            except TimeoutError:
                if time.monotonic() - last[0] >= idle_s:
                    return  # quiet both ways
                data = b""
                continue
            if not data:
                return  # closed

    tasks = [
        asyncio.ensure_future(pump(client, upstream, from_client)),
        asyncio.ensure_future(pump(upstream, client, from_upstream)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, OSError | TimeoutError):
                raise exc
    except (OSError, TimeoutError) as exc:
        raise ClientGone(str(exc) or type(exc).__name__) from exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
