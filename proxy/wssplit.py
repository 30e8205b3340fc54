"""What both hops of a tunnelled WebSocket do to hand their bytes to a frame splitter
(proxy/wsframes.py): the client hop's protocol (proxy/wsprotocol.py, over uvicorn's) and the
upstream hop's connection (relay/tunnel.py, over websockets'). Interpreted, unlike wsframes: it
is mixed into classes that extend the libraries' interpreted ones."""

from __future__ import annotations

from typing import Any

from .wsframes import FrameFeed, FrameSink, FrameSplitter, splitter_at_boundary


class SplitsFrames:
    """Mixed in before the library's class, whose `data_received` parses the hop's bytes.
    `_ws()` is the hop's websockets sans-I/O protocol; `_MASKED`, whether its frames are."""

    __slots__ = ("frame_sink", "splitter")
    _MASKED = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.splitter: FrameSplitter | None = None  # made by `relay_frames`, at a boundary
        self.frame_sink: FrameSink | None = None  # the session's, once it relays frames

    def _ws(self) -> Any:
        raise NotImplementedError

    def relay_frames(self, sink: FrameSink) -> None:
        """Whole data frames to `sink` from now on: at once if websockets' parser is between
        frames, else from the end of the frame it is in. The splitter then stays for the
        connection's life (it may hold the start of a frame, and it knows where frames begin); a
        session that ends stops its sink."""
        self.frame_sink = sink
        if self.splitter is not None:
            self.splitter.sink = sink
        else:
            self.splitter = splitter_at_boundary(sink, self._ws(), masked=self._MASKED)
            self._feed_splitter()

    def data_received(self, data: bytes) -> None:
        splitter = self.splitter
        if splitter is not None:
            splitter.feed(data)
            return
        super().data_received(data)  # type: ignore[misc]
        if self.frame_sink is not None:  # waiting for the parser to finish a frame
            self.splitter = splitter_at_boundary(self.frame_sink, self._ws(), masked=self._MASKED)
            self._feed_splitter()

    def _feed_splitter(self) -> None:
        """The transport's reads to the splitter directly from now on (wsframes.FrameFeed): this
        method stays the way in only for bytes handed to it by hand."""
        splitter = self.splitter
        transport: Any = getattr(self, "transport", None)
        if splitter is not None and transport is not None and not transport.is_closing():
            transport.set_protocol(FrameFeed(self, splitter))

    def parse_frames(self, data: bytes) -> None:
        """What the splitter leaves to the hop's parser (the library's `data_received`)."""
        super().data_received(data)  # type: ignore[misc]
