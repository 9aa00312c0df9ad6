-- wrk script for bench/http_load.py: POST one transmission body, the same for every request.
-- The body (JSON, about 2 KB, one recipient) is read once from the file named by
-- WRK_BODY_FILE; WRK_AUTH, when set, is sent as the Authorization header.
local f = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then
    wrk.headers["Authorization"] = auth
end
