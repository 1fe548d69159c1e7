-- Example schema for the demo and the tests. REPLICA IDENTITY FULL makes Postgres send the
-- whole old row on UPDATE and DELETE, so a change of a key column (users.email) can drop the
-- old key (user:email:<old>) and a delete can compute every key the row had.
CREATE TABLE IF NOT EXISTS users (
    id          bigint PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    tenant_id   int  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE users REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS orders (
    id          bigint PRIMARY KEY,
    user_id     bigint NOT NULL,
    tenant_id   int NOT NULL,
    total       numeric(12, 2) NOT NULL,
    status      text NOT NULL
);
ALTER TABLE orders REPLICA IDENTITY FULL;
