-- Issue 16 (the dashboard at 100,000 apps): one app's month-to-date usage (its page's "Usage this month")
-- walked the primary key `(hour, app, ...)` over every row of the month and kept the app's: about 100,000
-- index entries an hour at 100,000 apps, 72 million at a month's end. By app, then hour, it reads the app's
-- own rows only, and their numerators from the index itself. One index entry more per hourly row.
CREATE INDEX usage_hours_by_app ON usage_hours (app, hour) INCLUDE (numerator);
