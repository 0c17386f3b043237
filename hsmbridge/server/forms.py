"""multipart/form-data bodies, parsed from bytes already read under the body limit.

Only the routes that take forms (PEM key import, restore) parse them, in a
request thread: the body was read and size-capped like any other, so parsing
can neither read more nor spool to disk.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ApiError, bad_request
from .limits import DEFAULT, Limits

#: parts of a restore upload kept as bytes: the SDK sends the backup without a filename
BACKUP_FIELDS = ("backup_file",)


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def parse_multipart(
    content_type: str, body: bytes, limits: Limits = DEFAULT, binary: tuple[str, ...] = ()
) -> dict[str, str | bytes]:
    """Field name -> value (bytes for parts with a filename or named in ``binary``, else
    text); 400 if malformed."""
    try:  # a header is latin-1 on the wire; anything else did not come from one
        _, params = parse_options_header(content_type.encode("latin-1"))
    except UnicodeEncodeError:
        raise bad_request("the Content-Type header is not latin-1 text") from None
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("the multipart/form-data body has no boundary parameter")
    parts: list[tuple[bytes, bytearray]] = []  # (Content-Disposition, data)
    header = [bytearray(), bytearray()]  # the current header's name and value
    disposition = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= limits.max_form_parts:
            raise bad_request(f"a form may have at most {limits.max_form_parts} parts")
        disposition.clear()
        parts.append((b"", bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if bytes(header[0]).lower() == b"content-disposition":
            disposition[:] = header[1]
        header[0].clear()
        header[1].clear()

    def on_headers_finished() -> None:
        parts[-1] = (bytes(disposition), parts[-1][1])

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
        max_size=max(limits.max_body, limits.max_backup_body),
    )
    try:
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except ValueError as exc:  # python-multipart's parse errors
        raise bad_request(f"the multipart/form-data body is malformed: {exc}") from None
    form: dict[str, str | bytes] = {}
    for raw_disposition, data in parts:
        _, options = parse_options_header(raw_disposition)
        name = options.get(b"name")
        if name is None:
            raise bad_request('every form part needs a Content-Disposition with a "name"')
        try:
            key = name.decode("utf-8")
            raw = b"filename" in options or key in binary
            form[key] = bytes(data) if raw else data.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"form field {name[:40]!r} is not UTF-8 text") from None
    return form
