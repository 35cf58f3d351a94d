-- The triggers on the catalog (sql/schema.sql creates the tables): the append-only guard of the
-- log (function ep.events_guard, src/log) and the registry epoch that appends rely on (function
-- ep.projections_changed, src/registry). Runs after both the tables and the trigger functions.

-- Any change of ep.projections that matters to appends moves the registry epoch at commit.
CREATE TRIGGER projections_changed AFTER INSERT OR DELETE ON ep.projections
    FOR EACH ROW EXECUTE FUNCTION ep.projections_changed();
CREATE TRIGGER projections_truncated AFTER TRUNCATE ON ep.projections
    FOR EACH STATEMENT EXECUTE FUNCTION ep.projections_changed();
-- Appends notify the subscriptions of their types: the subscription list is part of the view.
CREATE TRIGGER subscriptions_changed AFTER INSERT OR UPDATE OR DELETE ON ep.subscriptions
    FOR EACH ROW EXECUTE FUNCTION ep.projections_changed();
CREATE TRIGGER subscriptions_truncated AFTER TRUNCATE ON ep.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION ep.projections_changed();
-- Async delivery updates position and error columns all the time; those do not concern appends.
CREATE TRIGGER projections_updated AFTER UPDATE ON ep.projections FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.generation IS DISTINCT FROM NEW.generation
          OR OLD.handler IS DISTINCT FROM NEW.handler OR OLD.batch IS DISTINCT FROM NEW.batch
          OR OLD.mode IS DISTINCT FROM NEW.mode OR OLD.event_types IS DISTINCT FROM NEW.event_types
          OR OLD.read_model_schema IS DISTINCT FROM NEW.read_model_schema OR OLD.owner IS DISTINCT FROM NEW.owner
          OR OLD.search_path IS DISTINCT FROM NEW.search_path OR OLD.name IS DISTINCT FROM NEW.name
          OR OLD.id IS DISTINCT FROM NEW.id OR OLD.replay_handler IS DISTINCT FROM NEW.replay_handler)
    EXECUTE FUNCTION ep.projections_changed();

-- The log is append-only (statement level, so TRUNCATE is caught too).
CREATE TRIGGER events_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON ep.events
    FOR EACH STATEMENT EXECUTE FUNCTION ep.events_guard();
