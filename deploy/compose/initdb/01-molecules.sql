-- Schema for the Docker Compose demo (run once by the postgres image's entrypoint, as
-- the superuser, in database app; tests/deploy/validate.sh runs it the same way).
-- The application role pgsidecar logs in as upstream. Demo password only: pgsidecar
-- gets it from PGSIDECAR_UPSTREAM_PASSWORD in docker-compose.yml.
CREATE ROLE app LOGIN PASSWORD 'app';

GRANT CONNECT, TEMPORARY ON DATABASE app TO app;

CREATE TABLE molecules (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    inchikey    char(27) NOT NULL UNIQUE
                CHECK (inchikey ~ '^[A-Z]{14}-[A-Z]{10}-[A-Z]$'),
    smiles      text NOT NULL CHECK (smiles <> ''),
    mol_weight  numeric(10, 4) NOT NULL CHECK (mol_weight > 0),
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX molecules_properties_idx ON molecules USING gin (properties jsonb_path_ops);
CREATE INDEX molecules_mol_weight_idx ON molecules (mol_weight);

ALTER TABLE molecules OWNER TO app;
