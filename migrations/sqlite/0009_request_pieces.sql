-- Lease-admitted requests' final records, packed: one row per write batch and id bucket (the
-- second of the request id's UUIDv7), its records in `data` (see src/store/pieces.rs). A row per
-- request was most of what lease billing cost the database. Requests admitted by holds, and
-- lease rows written before this migration, stay in `requests`.
CREATE TABLE request_pieces (
    id         INTEGER PRIMARY KEY,
    bucket     BIGINT NOT NULL,
    rows       BIGINT NOT NULL CHECK (rows > 0),
    data       BLOB NOT NULL,
    written_at BIGINT NOT NULL
);
CREATE INDEX request_pieces_bucket ON request_pieces(bucket);
