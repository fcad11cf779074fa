"""Word lists the built-in tasks draw from (plain data, fixed so every build sees the same tasks)."""

# Common short English words (3-7 letters), for the string-edit family.
COMMON_WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt best bird blow blue
boat body bone book born boss both bowl burn bush busy cake calm came camp card care case cash cast cell chip
city clay club coal coat code cold come cook cool copy corn cost crew crop dark data date dawn dead deal dear
deep desk diet dirt dish dock door dose down draw drop drum duck dust duty earn east easy edge else even ever
face fact fair fall farm fast fear feed feel file fill film find fine fire firm fish flag flat flow fold food
foot form fort free frog fuel full fund gain game gate gift girl give glad goal gold golf good grab gray grow
hair half hall hand hard harm hate have head heat help hero hide high hill hint hold hole home hope horn host
hour huge hunt idea inch iron item jazz join joke jump jury keen keep kick kind king kiss kite knee knot lack
lady lake lamp land lane last late lawn lazy lead leaf lean left lend lens life lift like line link lion list
live load loan lock long look loop lord lose loud love luck lung mail main make male mall many mark mask mass
meal meat meet melt menu mild milk mind mine miss mode mood moon more most move much nail name navy near neck
need nest news next nice nose note oven pace pack page pain pair palm park part pass past path peak pick pile
pine pink pipe plan play plot plus poem pole pool poor port post pour pull pump pure push race rail rain rank
rare rate read real rent rest rice rich ride ring rise risk road rock role roof room root rope rose rule rush
safe sail salt same sand save seat seed seek self sell send ship shoe shop shot show sick side sign silk sing
sink site size skin slip slow snow soap sock soft soil sold song soon sort soup spot star stay step stop suit
sure swim tail take tale talk tall tank tape task team tell tent term test text thin tide tile time tiny tire
tone tool tour town tree trip true tube tune turn twin type unit vast very view vote wage wait wake walk wall
want warm wash wave weak wear week well west wide wife wild wind wine wing wire wise wish wolf wood wool word
work yard year zero zone apple beach bread brick chair chest cloud crane dance dream drink earth field flame
glass grape grass heart horse house juice knife lemon light money mouse music night ocean paper party piano
plant plate queen radio river robot salad sheep shirt skirt smile snake sound space spoon stone storm sugar
table tiger toast tooth train truck watch water whale wheel woman world
""".split()

# Countable nouns (3-7 letters) for plural_word: plurals by the rules in builtin.plural, exceptions below.
NOUNS = """
apple area army baby ball band bank base basket bath beach bear bell belt bench bird blanket boat body bone book
boss bottle bowl box brick bridge brush bucket bus bush button cabin cake camera camp candle card carpet case castle
cell chair chest chip church city class cloud club coat code cook cookie copy corn corner cousin crane crew crop
dance date dawn desert desk diet dinner dish dock doctor door dose dragon dream drink drum duck duty edge engine
face fact farm farmer field file film finger fire fish flag flame flow flower food foot forest fort fox frog fund
game garage garden gate gift girl glass goal grape guitar hair half hall hammer hand head heart helmet hero hill
hint hole home horn horse host hour house idea inch island item jacket joke jump jury kettle king kite knee knife
knot ladder lady lake lamp land lane lawn leaf lemon lens letter life line lion list loan loop lord lung mall market
mask match meal menu mirror monkey mood moon mouse nail name navy neck needle nest night nose note ocean oven pack
page pain pair palm paper parent park party path peak pencil pepper piano pile pillow pine pipe planet plant plate
pocket poem pole pool port post pump queen rabbit race radio rail rank ribbon ring risk river road robot rock rocket
roof room root rope rose rule saddle sail salad seat seed sheep ship shirt shoe shop sister site size skin skirt
smile snake sock socket soil song sound soup spider spoon spot star statue stone storm street suit summer table tail
tale tank tape task team tent term text ticket tide tiger tile time tire toast tomato tone tool tooth tour town
train tree trip truck tube tune tunnel turtle twin unit valley wage wall wallet watch wave week whale wheel wife
wind window wine wing winter wire wizard wolf woman wood word world yard year zero zone
""".split()
IRREGULAR_PLURALS = {"fish": "fish", "foot": "feet", "half": "halves", "hero": "heroes", "knife": "knives",
                     "leaf": "leaves", "life": "lives", "mouse": "mice", "sheep": "sheep", "tomato": "tomatoes",
                     "tooth": "teeth", "wife": "wives", "wolf": "wolves", "woman": "women", "zero": "zeros"}

ANIMALS = """cat dog horse cow sheep goat pig rabbit mouse lion tiger bear wolf fox deer eagle owl parrot duck goose
frog snake lizard turtle shark whale dolphin salmon trout bee ant spider beetle camel zebra giraffe monkey
gorilla elephant hippo kangaroo koala otter beaver squirrel hedgehog bat crow pigeon swan penguin seal""".split()
PLANTS = """oak pine maple birch willow cedar palm fern moss ivy rose tulip daisy lily orchid sunflower cactus
bamboo clover grass wheat rice corn barley oats basil mint thyme sage lavender poppy violet lotus tomato
potato carrot lettuce cabbage onion garlic pumpkin melon cotton tobacco hemp reed seaweed dandelion""".split()
ADJECTIVES = "small big young old wild tall tiny quiet green brown lovely strange common rare healthy".split()

POSITIVE = """good great happy wonderful excellent lovely amazing delightful pleasant brilliant superb joyful
cheerful fantastic charming kind beautiful perfect fun exciting""".split()
NEGATIVE = """bad terrible sad awful horrible boring ugly dreadful poor nasty gloomy annoying painful rude
disappointing dull miserable worse weak angry""".split()
REVIEW_SUBJECTS = """movie meal hotel book concert trip show game class party song dinner film visit lesson
service""".split()

COLORS = "red blue green yellow purple orange pink brown black white gray violet crimson teal beige gold".split()
SHAPES = """circle square triangle rectangle oval star hexagon pentagon diamond cube sphere cone cylinder pyramid
heart arrow""".split()
THINGS_PEOPLE = """Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Noah Olga Paul""".split()

FRUITS = """apple banana cherry grape lemon lime mango orange peach pear plum kiwi papaya apricot fig melon
coconut pineapple raspberry strawberry blueberry""".split()
VEGETABLES = """carrot potato onion garlic cabbage lettuce spinach broccoli celery pea bean radish turnip
cucumber zucchini leek kale beet asparagus cauliflower""".split()

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
TOOLS = "hammer saw wrench drill screwdriver pliers chisel shovel rake axe ladder tape".split()
FOODS = "bread cheese soup pasta rice cake pizza salad butter honey yogurt sausage".split()

LIST_ITEMS = """apple river stone cloud tiger lemon chair piano green seven paper music ocean bread candle
window garden silver rocket forest""".split()
