-- KEYS m p w; ARGV addr now ttl safety
redis.call('HSET', KEYS[1], 'addr', ARGV[1], 'created', ARGV[2], 'exp', ARGV[2] + ARGV[3],
           'np', 0, 'dl', '0-0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
