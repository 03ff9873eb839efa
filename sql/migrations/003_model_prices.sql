-- 003: price overrides. The SDK ships a versioned price table (usage/pricing.py); a row here
-- overrides it for one provider and model, for usage rows dated on or after effective_from.
-- model = '*' prices every model of the provider. Prices are USD per million tokens.
-- NULL cached_input_per_m / reasoning_per_m: those tokens are billed at the input / output price.
-- The SDK reads this table at start and at each maintenance interval (PriceBook.refresh).

CREATE TABLE IF NOT EXISTS model_prices (
    provider           text          NOT NULL,
    model              text          NOT NULL,
    input_per_m        numeric(12, 6) NOT NULL CHECK (input_per_m >= 0),
    output_per_m       numeric(12, 6) NOT NULL CHECK (output_per_m >= 0),
    cached_input_per_m numeric(12, 6) CHECK (cached_input_per_m >= 0),
    reasoning_per_m    numeric(12, 6) CHECK (reasoning_per_m >= 0),
    effective_from     date          NOT NULL,
    note               text,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model, effective_from),
    -- The SDK matches names case-insensitively; storing them lower-case keeps the PK honest.
    CHECK (provider = lower(provider) AND model = lower(model))
);

COMMENT ON TABLE model_prices IS
    'Per provider/model price overrides (USD per million tokens) from effective_from on; '
    'override the prices shipped with llm-gateway.';
