-- What cdcd needs in the source database, for operators who run it with
-- create_slot: false / create_publication: false (least privilege).
--
-- 1. postgresql.conf (restart required):
--      wal_level = logical
--      max_replication_slots >= 1 (one per cdcd deployment)
--      max_wal_senders >= 1
--
-- 2. A role that may stream changes and read the catalog:
CREATE ROLE cdcd WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO cdcd;
--    (pg_hba.conf needs a "replication" line for this role, e.g.
--     host  replication  cdcd  10.0.0.0/8  scram-sha-256)
--
-- 3. Send whole old rows on UPDATE/DELETE, so an update that changes a key column
--    (e.g. users.email) invalidates the old key and a delete can compute every key:
ALTER TABLE public.users  REPLICA IDENTITY FULL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;
--
-- 4. The publication: only the tables that have rules (FOR ALL TABLES also works;
--    changes of tables without rules are then counted as cdcd_unmapped_total).
CREATE PUBLICATION cdcd FOR TABLE public.users, public.orders
    WITH (publish = 'insert, update, delete, truncate');
--
-- 5. The slot. Its confirmed position is cdcd's checkpoint: it keeps WAL until cdcd
--    has applied the changes to Redis. Watch pg_replication_slots (cdcd_slot_retained_wal_bytes);
--    dropping the slot loses changes (cdcd then invalidates every table tag on restart).
SELECT pg_create_logical_replication_slot('cdcd', 'pgoutput');
